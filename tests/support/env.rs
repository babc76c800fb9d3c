//! Isolated EarnORM environments for tests.
