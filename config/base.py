# MusicGen 32 kHz, small: AudioCraft's solver/musicgen/musicgen_base_32khz.yaml over musicgen/default.yaml, the
# recipe the defaults already hold, spelled out so a reader sees it in one place. Assigning a default changes
# nothing, not even the signature. Config files are plain Python run by train.py: they may import and compute;
# helper names start with _.
#
# Where the defaults differ from AudioCraft's recipe on purpose (each one key away from AudioCraft's behaviour):
#   optimizer      AdamW lr 1e-4 (AudioCraft's base yaml: D-Adaptation Adam lr 1; its grids use AdamW 1e-4 for
#                  medium and large)
#   precision      dtype = "bfloat16" autocast, no scaler (AudioCraft: float16 + GradScaler; dtype="float16" here)
#   CFG dropout    one coin per sample (AudioCraft: one per batch; cfg_dropout_per_batch = True)
#   padding        padded frames are masked from the loss (AudioCraft trains on them; train_on_padding = True)
#   EMA schedule   every 10 updates of the run (AudioCraft counts within an epoch; equal when 10 divides 2000)
#   generate stage generate_duration = 10 s, generate_count = 4 unprompted samples (AudioCraft: 30 s, prompted
#                  and unprompted); evaluate stage: ce/ppl and a codec-latent Frechet distance (AudioCraft's
#                  metrics are off by default)
#   valid          the whole valid split (AudioCraft: valid.num_samples 10,000)

# audio and tokens: EnCodec 32 kHz, 4 codebooks x 2048, 50 frames/s, 30 s segments, >= 80% real audio
codec = "//reference/encodec_32khz"
n_q = 4
card = 2048
segment_duration = 30.0
min_segment_ratio = 0.8
pattern = "delay"

# data: uniform file sampling ("uniform sampling all the way"), AudioCraft's text augmentation
sample_on_weight = False
sample_on_duration = False
merge_text_p = 0.25
drop_desc_p = 0.5
keep_field_p = 0.5

# model: small (420M)
dim = 1024
n_layers = 24
n_heads = 16

# text: frozen t5-base -> Linear(768, dim) as cross-attention memory, unmasked (as the released models)
conditioner = "t5"
t5_path = "//reference/t5-base"
mask_memory = False
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
dtype = "bfloat16"
cfg_dropout_per_batch = False
train_on_padding = False

# stages and sampling
generate_every = 25
evaluate_every = 25
save_every = 50
generate_duration = 10.0
top_k = 250
cfg_coef = 3.0
