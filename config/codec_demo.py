# The demo's codec: a small EnCodec (SEANet + LSTM + residual VQ) trained on the synthetic demo set, on a CPU.
#   python train_codec.py config/codec_demo.py
# 16 kHz with MusicGen's frame rate (50 Hz, hop 320) and 4 codebooks of 256 entries (1.6 kbps). AudioCraft's
# losses and balancer (L1 + multi-scale mel), without the GAN: its discriminator costs more than the codec on a CPU.
dataset = "demo"
sample_rate = 16000
ratios = (8, 5, 4, 2)
n_filters = 8
dimension = 32
lstm = 1
n_q = 4
card = 256

adv = 0.0
feat = 0.0
lr = 1e-3

segment_duration = 0.5
valid_duration = 2.0
batch_size = 8
epochs = 30
updates_per_epoch = 500
num_workers = 1

generate_every = 5
generate_count = 4
generate_duration = 4.0
save_every = 5
log_every = 100
