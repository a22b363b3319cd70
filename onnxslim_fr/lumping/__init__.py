"""Planning: pure numpy / scipy decisions about which channels go and what replaces them."""
