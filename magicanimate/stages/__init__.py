"""Stages around the animation (MagicVideo-V2's multi-stage recipe, docs/stages.md), each off by default:

* :mod:`.prompt_reference`: a reference photo from a text prompt (SD 1.5, the release tree's own weights);
* :mod:`.refine`: a second, SDEdit-style pass at a larger size over the first pass's result.

Only the standard library is imported here; each stage imports torch and diffusers when it is used.
"""
