"""a round's burst step: round → job link

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('fl_round') as batch:
        batch.add_column(sa.Column('job_id', sa.Integer(), nullable=True))
    with op.batch_alter_table('burst_job') as batch:
        batch.add_column(sa.Column('round_id', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('burst_job') as batch:
        batch.drop_column('round_id')
    with op.batch_alter_table('fl_round') as batch:
        batch.drop_column('job_id')
