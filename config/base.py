# MusicGen 32 kHz, small (AudioCraft's musicgen_base_32khz with AdamW): the recipe the defaults already hold,
# spelled out so a reader sees it in one place. Assigning a default changes nothing, not even the signature.
# Config files are plain Python run by train.py: they may import and compute; helper names start with _.

# audio and tokens: EnCodec 32 kHz, 4 codebooks x 2048, 50 frames/s, 30 s segments
codec = "//reference/encodec_32khz"
n_q = 4
card = 2048
segment_duration = 30.0
pattern = "delay"

# model: small (420M)
dim = 1024
n_layers = 24
n_heads = 16

# text: frozen t5-base -> Linear(768, dim) as cross-attention memory
conditioner = "t5"
t5_path = "//reference/t5-base"
cfg_dropout = 0.3
word_dropout = 0.3

# optimisation
batch_size = 192
lr = 1e-4
betas = (0.9, 0.95)
weight_decay = 0.1
lr_schedule = "cosine"
warmup = 4000
max_norm = 1.0
ema_decay = 0.99
ema_every = 10
epochs = 500
updates_per_epoch = 2000

# sampling
top_k = 250
cfg_coef = 3.0
