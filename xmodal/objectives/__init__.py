"""Training objectives, one file per loss family."""

from xmodal.objectives.contrastive import clip_loss, contrastive_loss, gather_with_grad, siglip_loss

__all__ = ["clip_loss", "contrastive_loss", "gather_with_grad", "siglip_loss"]
