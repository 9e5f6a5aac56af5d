"""Privacy: record-level DP-SGD (:mod:`fedmem.privacy.dp`), how epsilon is reported
(:mod:`fedmem.privacy.epsilon`) and the post-hoc privacy audit of finished runs
(:mod:`fedmem.privacy.audit`).

Importing this package is cheap: it imports none of its subpackages (nor Opacus).
"""
