"""Training: optimizer (Muon + AdamW, V4 schedule) and the training loop pieces."""
