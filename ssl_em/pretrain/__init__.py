"""Self-supervised pretraining methods (Lightning modules over timm backbones)."""
