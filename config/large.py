# MusicGen large (3.3B): load after base.py. AudioCraft's grid also lowers both dropouts and clips at 3.
dim = 2048
n_layers = 48
n_heads = 32
cfg_dropout = 0.2
word_dropout = 0.2
max_norm = 3.0
