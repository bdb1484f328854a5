# A tiny model on the built-in synthetic music set: trains end to end on a laptop CPU in about a minute.
#   python train.py config/debug.py
# The demo set (written under <runs_dir>/data/demo on first use, then tokenized once) states timbre, tempo,
# register and mode in its descriptions, so even this model learns to use the text: valid ce falls below
# ce_uncond (the same model given no text) within a few epochs.
codec = "demo"             # the demo's EnCodec, trained on this kind of music (assets/demo_codec.bin): 16 kHz, 4 x 256, 50 frames/s
n_q = 4
card = 256
dataset = "demo"
segment_duration = 1.0

dim = 64
n_layers = 2
n_heads = 4

conditioner = "lut"        # no T5 needed: each word hashed into one of 1024 learned embeddings
lut_tokenizer = "words:1024"
lut_dim = 64
lut_layers = 0
mask_memory = True         # trained from scratch: padded text positions are masked (AudioCraft attends to them)
word_dropout = 0.1

batch_size = 16
lr = 3e-3
warmup = 20
epochs = 3
updates_per_epoch = 60
ema_every = 5
ema_decay = 0.9
dtype = "float32"          # bf16 autocast is slow on most CPUs
num_workers = 1

generate_every = 3
evaluate_every = 3
generate_duration = 2.0
generate_count = 8          # the generate split: four timbres, low then high register
top_k = 50
save_every = 1
log_every = 20
