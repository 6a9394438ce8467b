"""The knowledge base: bibliography, catalog, citation export, notebooks pipeline and site generation.

Plain Python with no torch dependency, so ``rlvg cite`` and the site build stay light.
"""
