"""rholearn: equivariant learning of electron densities in atom-centred auxiliary bases."""

__version__ = "0.1.0"
