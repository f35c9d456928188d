"""The rollout service: concurrent sessions (`manager`), the HTTP API and web console
(`http_api`, `console/`), the client protocol with its local and HTTP
implementations (`client`), and the command line (`cli`)."""
