"""The measurement room, on the ground floor: MACs, wall-clock latency, peak memory, fidelity.

Every floor may import it (the SuperNets count their blocks' MACs, the block kind times its
blocks, the kernels time themselves, the report times and scores the SubNets), and it imports
nothing of dipgo above :mod:`dipgo.errors` / :mod:`dipgo.files`.
"""
