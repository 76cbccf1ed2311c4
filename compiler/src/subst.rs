//! Flux post-build variable substitution (issue 13); filled in by the session that builds it.
