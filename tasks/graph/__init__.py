"""Graph task: GAT/GATv2 models (registered with task="graph"), the DictionaryLookup benchmark, offline
graph datasets and the Planetoid/OGB adapters, Lightning modules, `zoo viz graph`.

Importing this package registers the models of :mod:`zoo.tasks.graph.gat`.
"""
from zoo.tasks.graph import gat  # noqa: F401  (registers the models)
