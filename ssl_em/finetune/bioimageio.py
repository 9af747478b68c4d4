"""Where bioimage.io packages exported before ssl_em 0.1's inference package was split out
find their network: their `pytorch_state_dict` weights name
`ssl_em.finetune.bioimageio.ProbabilityNet` (packages exported since name
`ssl_em.inference.bioimageio`). Kept so a package a user was sent still loads."""

from ssl_em.inference.bioimageio import ProbabilityNet

__all__ = ["ProbabilityNet"]
