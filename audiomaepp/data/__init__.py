"""Log-mel shards (`builders`, `sources`), the Grain input pipeline and the synthetic corpus.

Submodules are imported explicitly (`from audiomaepp.data import pipeline`): spawned encoding
workers import `sources` alone and should not pay for Grain and TFDS.
"""
