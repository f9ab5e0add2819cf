"""`xmodal caption`: captions from a CoCa run, for a few image files or a whole manifest.

`images` decodes image files and batches the decoder (seeded per batch for --top-p); `manifest` captions
a manifest in resumable chunks and writes a new manifest that `xmodal train --data` reads. Decoding
itself lives in `xmodal.models.captioner`.
"""
