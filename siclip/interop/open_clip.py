"""open_clip in siclip: block converters, attention readers, the CLIP adapter and its preprocessing.

Imported by siclip's registries the first time they meet an open_clip object (never by siclip otherwise).
"""

from __future__ import annotations

import open_clip  # noqa: F401  (this module exists for this library; siclip.blocks.registry imports it lazily)

# ── block converters (SAS-P) ─────────────────────────────────────────────────────────────────────────────────────


# ── attention readers (divergence) ───────────────────────────────────────────────────────────────────────────────


# ── CLIP adapter: teachers and evaluation, preprocessing ─────────────────────────────────────────────────────────
