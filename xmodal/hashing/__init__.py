"""Learned cross-modal hash codes: small heads on a frozen model's embeddings (dcmh, bebr objectives)."""
