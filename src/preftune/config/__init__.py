"""The parameter surface, torch-free: one dataclass per step, each field carrying its help, default and allowed
values (fields.param). The stages validate with it, the components take their parameters from it
(components.SURFACES), and `preftune run --help`, its refusals and the component READMEs are derived from it."""
