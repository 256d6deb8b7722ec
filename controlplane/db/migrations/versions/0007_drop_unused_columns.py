"""Drop columns nothing reads: device.mqtt_password_hash, fl_round.result_token, fl_round.flower_run_id

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26

`device.mqtt_password_hash` was written at enrolment and never read (the broker checks device passwords against its
own credential store); `fl_round.result_token` belonged to the ServerApp's HTTP result callback, which is gone
(the control plane reads the run's results file); `fl_round.flower_run_id` was never written.
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # `device` is referenced by device_tag: on SQLite a batch "move and copy" would drop a table other rows
    # reference, which the enforced foreign keys refuse, so a plain DROP COLUMN (SQLite >= 3.35).
    op.drop_column('device', 'mqtt_password_hash')
    with op.batch_alter_table('fl_round') as batch:
        batch.drop_column('result_token')
        batch.drop_column('flower_run_id')


def downgrade() -> None:
    # The values are gone: the restored NOT NULL columns hold empty strings.
    with op.batch_alter_table('fl_round') as batch:
        batch.add_column(sa.Column('flower_run_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True))
        batch.add_column(sa.Column('result_token', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False,
                                   server_default=''))
    op.add_column('device', sa.Column('mqtt_password_hash', sqlmodel.sql.sqltypes.AutoString(), nullable=False,
                                      server_default=''))
