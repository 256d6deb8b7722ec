"""Deployments as desired state: deadlines, rollbacks of a deployment, each target's previous model

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26

Targets not sent yet were "waiting"; they are "pending" now (waiting for their wave or for the device to come
online).
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('deployment', sa.Column('rollback_of', sa.Integer(), nullable=True))
    op.add_column('deployment', sa.Column('deadline_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('deployment_target',
                  sa.Column('previous_model', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
    op.execute("UPDATE deployment_target SET status = 'pending' WHERE status = 'waiting'")


def downgrade() -> None:
    # The statuses 0005 did not know become the nearest it did.
    op.execute("UPDATE deployment_target SET status = 'waiting' WHERE status = 'pending'")
    op.execute("UPDATE deployment_target SET status = 'failed' "
               "WHERE status IN ('timed_out', 'cancelled', 'superseded')")
    op.execute("UPDATE deployment SET status = 'halted' "
               "WHERE status IN ('paused', 'timed_out', 'cancelled', 'superseded')")
    op.drop_column('deployment_target', 'previous_model')
    op.drop_column('deployment', 'deadline_at')
    op.drop_column('deployment', 'rollback_of')
