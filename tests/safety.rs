//! (safety tests: added by the safety checker work)
