"""Step 7, the fidelity report: every stage scored against PyTorch on every image, the fp16 OM emulated.

``stages`` names the stages and the work folder they read; ``screen`` picks the images where a stage can
change Top-1/Top-5 so that all are scored for about one inference pass; ``runners`` runs a stage and stores
its logits (``logit_store``); ``report`` writes the JSON and Markdown; ``om_emulation`` builds the fp16 model
as atc does, saturating as the 310P does; ``fp16_overflow`` finds where it saturates; ``locate`` finds the
first block that drifts; ``keep_dtype`` and ``keep_suggestion`` read and suggest atc's ``--keep_dtype`` list.
"""
