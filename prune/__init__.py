"""Layer removal, attention/MLP sub-layer removal and layer tying.

Plans can already name these actions; applying them is not implemented yet, and
`layerwise.applier` refuses such plans with a clear error.
"""
