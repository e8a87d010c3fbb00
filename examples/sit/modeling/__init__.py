"""The SiT model and its math: the network, interpolant transports, ODE/SDE samplers, ANM's alpha at other widths."""
