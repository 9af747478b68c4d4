"""ssl_em: self-supervised foundation models for electron microscopy."""

__version__ = "0.1.0"


def load_backbone(path, **kwargs):
    """Load an exported backbone strictly; returns (timm model, BackboneMeta). See ssl_em.backbones."""
    from ssl_em.backbones import load_backbone as _load

    return _load(path, **kwargs)


def preprocessing(path):
    """ssl_em's exact preprocessing (stretch + standardise) for an exported backbone. See ssl_em.backbones."""
    from ssl_em.backbones import preprocessing as _preprocessing

    return _preprocessing(path)


__all__ = ["__version__", "load_backbone", "preprocessing"]
