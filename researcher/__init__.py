"""The researcher SDK: Experiment, aggregators, node selection, monitoring, breakpoints."""
