"""The architecture-search networks: NASNet-A, AmoebaNet-A and PNASNet-5.

``genotypes`` writes each searched cell as data, ``cells`` builds cells and networks from a
genotype, and ``nasnet``, ``amoebanet`` and ``pnasnet`` lay out and register each paper's
networks.
"""
