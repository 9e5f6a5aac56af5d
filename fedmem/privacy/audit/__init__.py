"""Privacy audit of a finished run: canary exposure, membership inference, empirical epsilon.

For each model the run trained (``central`` and ``federated``, from ``checkpoints/``):

1. **Canary exposure** (Carlini et al. 2019) of every ``data.canaries`` canary among the
   never-inserted reference canaries, grouped by copies and by holding clients
   (:mod:`fedmem.privacy.audit.exposure`).
2. **Record-level membership inference** on the ``audit.pool`` candidates (each trained on
   w.p. 1/2, :mod:`fedmem.data.table`): loss threshold (Yeom et al. 2018), LiRA online and
   offline (Carlini et al. 2022) and RMIA offline (Zarifzadeh et al. 2024), with
   ``audit.attack.shadows`` shadow models trained by the batched ensemble trainer on random
   halves of the candidates plus every non-candidate row, with the target's recipe
   (:mod:`fedmem.privacy.audit.shadows`: central, or FedAvg over the same clients).
3. **Client-level membership inference**: the mean per-example loss score over a client's
   examples, training clients (members) vs ``audit.heldout_clients`` (non-members).
4. **Empirical epsilon in one run** (Steinke, Nasr & Jagielski 2023) from the attack scores of
   the ``audit.canaries`` audit canaries, beside the accountant's epsilon; a lower bound above
   a claimed epsilon is a violation (:func:`fedmem.privacy.audit.report.violations`): the DP
   code would be wrong.

:func:`~fedmem.privacy.audit.engine.run_audit` writes ``audit.json``,
``plots/audit_roc_<run>.png`` and an ``audit`` section in ``summary.json`` / ``report.md``. It
is cached by the run's config hash and the ``audit.attack`` settings.

Modules: :mod:`~fedmem.privacy.audit.records` (open and check a run, load its models),
:mod:`~fedmem.privacy.audit.data` (shadow rows), :mod:`~fedmem.privacy.audit.shadows`
(batched shadow training, both recipes), :mod:`~fedmem.privacy.audit.attacks`,
:mod:`~fedmem.privacy.audit.exposure` and :mod:`~fedmem.privacy.audit.one_run` (the attacks
and bounds), :mod:`~fedmem.privacy.audit.scoring` (pure pieces),
:mod:`~fedmem.privacy.audit.target` (one target model), :mod:`~fedmem.privacy.audit.engine`
(the whole audit: :func:`~fedmem.privacy.audit.engine.run_audit`) and
:mod:`~fedmem.privacy.audit.report` (reading ``audit.json``). Importing this package imports
none of them.
"""
