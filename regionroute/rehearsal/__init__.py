"""The dress rehearsal of the paper run on CPU (``regionroute rehearse``): :func:`regionroute.rehearsal.run.rehearse`.

Stand-ins for the paper's models in the Hugging Face hub cache layout (:mod:`.hub`, :mod:`.kontext`,
:mod:`.judges`), a dataset in COCO 2017's layout (:mod:`.coco`), and ``dvc repro`` of a copy of the
repository on ``configs/paper.yaml`` changed only in counts and device (:mod:`.run`), checked by
:mod:`.verify`. README "Dress rehearsal" says how to run it.
"""
