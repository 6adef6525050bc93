"""The adversary as a permanent part of sevsim: a fuzzing campaign against an oracle.

- :mod:`fuzz.oracle`: what KVM must answer to a GHCB MSR-protocol value or a GHCB-page
  VMGEXIT, written from ``REFERENCE.md`` apart from sevsim's kvm and plugins;
- :mod:`fuzz.cases`: a case (one to three exits) as data, its JSON form and its pages;
- :mod:`fuzz.generate`: cases and random guest code biased toward boundaries, drawn
  from a seeded ``random.Random`` (long campaigns) or from hypothesis (tests);
- :mod:`fuzz.execute`: one case through kvm without a guest (``ExitDriver``) or in a
  real guest, compared with the oracle; random code run in a guest;
- :mod:`fuzz.campaign`: the campaign loop, its reproducers and its command line
  (``python -m fuzz.campaign --help``).

``docs/fuzzing.md`` explains how to run it and how to replay what it finds.
"""
