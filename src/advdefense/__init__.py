"""advdefense: RNA, CAS and smoothed noise-injected models, with honest adaptive evaluation."""

__version__ = "0.1.0"
