"""Data layer: task contracts, HDF5 datasets, weak labels, synthetic federations, importers."""
