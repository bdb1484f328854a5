# MusicGen-melody: text and melody. Load after a size, as AudioCraft's config/conditioner/chroma2music.yaml over its
# recipe (solver musicgen_melody_32khz):
#   python train.py config/debug.py config/melody.py                      # a tiny melody model on the demo set
#   python train.py config/base.py config/medium.py config/melody.py      # the released musicgen-melody's shape
#   python train.py config/base.py config/medium.py config/melody.py --continue_from=//reference/musicgen-melody
#   python generate.py --run=SIG --prompt="lofi piano" --melody=tune.wav  # follow a melody
# The melody is the chroma of the training audio itself (the condition self_wav: 12 pitch classes, 7.8 frames per
# second, melody.py), computed once per file into a cache beside the token cache. Both conditions go in front of the
# music (prepend), so the model has no cross-attention; training drops the melody half of the time (per sample here,
# one coin per batch in AudioCraft: attribute_dropout_per_batch = True), so the model also learns without one.
chroma_fuse = "prepend"
fuse = "prepend"
attribute_dropout = ("self_wav:0.5",)
cfg_dropout = 0.2
word_dropout = 0.2
# AudioCraft takes the chroma of the song without drums and bass (Demucs: pip install demucs, weights under
# //reference); "" keeps the full mix, which this run's config.json records (and its chroma cache is named for).
chroma_stems = ""
