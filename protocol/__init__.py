"""What the packages exchange: the typed messages and the per-token statistics they carry.

actors/, prefix_store/ and learner/ all import this package and none of them
imports another for these types, so there is no import cycle between them.
"""
