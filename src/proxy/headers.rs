//! Header rules for forwarded requests: hop-by-hop removal, identity strip-then-inject and
//! `X-Forwarded-*`.
