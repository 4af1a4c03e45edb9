"""Training code: synthetic clips, data folders, the V3 slice VAE, the text encoder, the V3 InP transformer,
LoRAs. Used by `python -m easyanimate make-data | train-text | train-vae | train-dit | train-lora`."""
