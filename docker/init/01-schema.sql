-- Sample fintech schema for the docker-compose demo. Runs once, when the postgres volume
-- is first initialised (docker-entrypoint-initdb.d), as the superuser in database `app`.
-- Protected columns are bytea: Strongroom stores its envelopes there and shows the app the
-- logical type from `protect:` in docker/strongroom.yaml. *_bidx columns hold blind indexes.

CREATE ROLE app LOGIN PASSWORD 'app-secret';
CREATE ROLE support_agent LOGIN PASSWORD 'support-secret';
CREATE ROLE etl_backup LOGIN PASSWORD 'etl-secret';

CREATE TABLE public.customers (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text   NOT NULL,
    tax_id      bytea,          -- protected: text, randomized
    tax_id_bidx bytea,          -- blind index of tax_id
    address     bytea           -- protected: text, randomized
);
CREATE INDEX customers_tax_id_bidx ON public.customers (tax_id_bidx);

CREATE TABLE public.accounts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES public.customers (id),
    iban        bytea UNIQUE,   -- protected: text, deterministic (equality, unique)
    balance     bytea           -- protected: numeric, randomized
);

CREATE TABLE public.cards (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES public.customers (id),
    pan         bytea,          -- protected: text, randomized (cardholder data, PCI DSS)
    pan_bidx    bytea,          -- blind index of pan
    expiry      bytea           -- protected: date, randomized
);
CREATE INDEX cards_pan_bidx ON public.cards (pan_bidx);

GRANT USAGE ON SCHEMA public TO app, support_agent, etl_backup;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO app;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO support_agent, etl_backup;
