"""DyCE offline toolchain (``dyce-offline``): data splits, demo backbone, frozen-backbone exit
training, exit records, configuration search (paper Sec. V) into a bank, and the report."""
