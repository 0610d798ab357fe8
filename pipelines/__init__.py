"""Kubeflow pipeline definitions around :mod:`paploss.steps`: the search pipeline,
its local runner (``paploss run``), compile and submit. Imports kfp; the library
``paploss`` never does."""
