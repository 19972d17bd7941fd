//! Endpoints: `/register`, `/login`, `/logout`, `/refresh`.
