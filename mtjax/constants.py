"""Physical constants (SI, CODATA 2018)."""

HBAR = 1.054571817e-34  # J s
E_CHARGE = 1.602176634e-19  # C
MU0 = 1.25663706212e-6  # T m / A  (N / A^2)
KB = 1.380649e-23  # J / K
GAMMA_E = 1.76085963023e11  # electron gyromagnetic ratio |gamma|, rad / (s T)
GAMMA0 = GAMMA_E * MU0  # gamma * mu0, m / (A s)

#: Internal time unit of the solvers: times are integrated in nanoseconds.
TIME_UNIT = 1e-9  # s
