# A tiny model on the built-in synthetic music set: trains end to end on a laptop CPU in about a minute.
#   python train.py config/debug.py
# The demo set (written under <runs_dir>/data/demo on first use) states timbre, tempo, register and mode in
# its descriptions, so even this model learns to follow text: watch valid ce fall below ce_uncond.
codec = "debug"            # a tiny deterministic EnCodec-shaped codec: 32 kHz, 4 codebooks x 256, 50 frames/s
n_q = 4
card = 256
dataset = "demo"
segment_duration = 4.0

dim = 128
n_layers = 4
n_heads = 4

conditioner = "lut"        # no T5 needed: byte tokens, one trainable transformer layer
mask_memory = True         # trained from scratch: padded text positions are masked (AudioCraft attends to them)
lut_tokenizer = "bytes"
lut_dim = 128
lut_layers = 1
word_dropout = 0.1

batch_size = 16
lr = 2e-3
warmup = 20
epochs = 4
updates_per_epoch = 50
ema_every = 5
ema_decay = 0.9
dtype = "float32"          # bf16 autocast is slow on most CPUs
num_workers = 1

generate_every = 4
evaluate_every = 4
generate_duration = 4.0
generate_count = 4
top_k = 50
save_every = 2
log_every = 10
