"""One module per paper; importing ``vertebra.registry`` loads them all on first look-up."""
