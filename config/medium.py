# MusicGen medium (1.5B): load after base.py.  python train.py config/base.py config/medium.py
dim = 1536
n_layers = 48
n_heads = 24
