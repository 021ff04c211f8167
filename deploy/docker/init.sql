-- Runs once, when the postgres volume is created: the tables of the
-- example pipeline (deploy/docker/walcast.toml).
CREATE TABLE public.orders (
    id          bigserial PRIMARY KEY,
    customer_id bigint      NOT NULL,
    status      text        NOT NULL DEFAULT 'new',
    total       numeric(12, 2) NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE public.order_lines (
    order_id bigint  NOT NULL REFERENCES public.orders (id) ON DELETE CASCADE,
    line     integer NOT NULL,
    sku      text    NOT NULL,
    quantity integer NOT NULL,
    PRIMARY KEY (order_id, line)
);
