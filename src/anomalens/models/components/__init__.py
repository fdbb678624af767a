"""Building blocks shared by several methods (layers, feature embeddings, networks, residual maps).

A method file imports these, never another method's file, so each method can change alone.
"""
