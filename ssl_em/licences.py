"""The licence of a set of weights: stated by whoever exports them, never assumed.

Weights carry the terms of the data they were trained on (ISBI 2012 is research use with
citation, FAFB asks to check its terms, a lab's own data may be unpublished), and ssl_em
cannot know those terms. So a backbone's licence is what `ssl-em export --license ID`
states, recorded in its ssl_em.json as `license`; without one, the model card says
`license: other` and points at its training data, instead of borrowing the licence of
ssl_em's code (BSD-3-Clause), which says nothing about the weights.

A fine-tuned model inherits its backbone's stated licence; where there is none (a backbone
that states none, or a network trained from scratch on the lab's labels) a format that needs
one (bioimage.io) asks for it by name.
"""

from __future__ import annotations

from ssl_em.errors import UserError

#: What the model card's front matter says when no licence was stated (the Hugging Face
#: Hub's value for "see the card").
UNSTATED = "other"

#: Used when `packaging` (>= 24.2, which carries the SPDX list) is missing: common ones.
KNOWN_LICENSES = ("BSD-3-Clause", "BSD-2-Clause", "MIT", "Apache-2.0", "CC-BY-4.0", "CC-BY-SA-4.0", "CC-BY-NC-4.0", "CC-BY-NC-SA-4.0",
                  "CC0-1.0", "GPL-3.0-only", "GPL-3.0-or-later", "LGPL-3.0-only", "MPL-2.0", "ODbL-1.0", "Unlicense")


def spdx_license(text: str, flag: str = "--license") -> str:
    """The SPDX identifier `text` names, in its canonical case (bsd-3-clause ->
    BSD-3-Clause); UserError naming `flag` otherwise: a typo would leave the weights' terms
    unstated."""
    try:
        from packaging.licenses import LICENSES

        known = {k: v["id"] for k, v in LICENSES.items()}
    except ImportError:
        known = {k.lower(): k for k in KNOWN_LICENSES}
    found = known.get(str(text).strip().lower())
    if found is None:
        import difflib

        close = difflib.get_close_matches(str(text).lower(), list(known), n=3)
        hint = f"; did you mean {', '.join(known[c] for c in close)}?" if close else " (see https://spdx.org/licenses/)"
        raise UserError(f"{flag} {text}: not an SPDX licence identifier{hint}")
    return found


def inherited_license(backbone_license: str | None, random_init: bool) -> str | None:
    """The licence a fine-tuned model's weights inherit: its pretrained backbone's stated one;
    None for a backbone that states none and for random init (the weights come from the
    lab's own labels, whose terms only the lab knows)."""
    return None if random_init else backbone_license


def require_license(stated: str | None, inherited: str | None, what: str, flag: str = "--license") -> str:
    """The SPDX licence to write for `what`: `stated` (checked) when given, else `inherited`;
    UserError asking for `flag` when neither exists."""
    if stated:
        return spdx_license(stated, flag)
    if inherited:
        return spdx_license(inherited, "the backbone's license")
    raise UserError(f"{what}: name the licence of these weights with {flag} ID (an SPDX identifier, e.g. CC-BY-4.0): they derive "
                    "from the data they were trained on (the labeled images, and a pretrained backbone's data, listed on its card), "
                    "whose terms ssl_em cannot know, and the backbone states no licence")
