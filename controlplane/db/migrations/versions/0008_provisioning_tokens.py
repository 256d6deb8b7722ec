"""Provisioning tokens (devices enrol themselves) and each device's Flower SuperNode public key

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26

Only the token's SHA-256 is stored: the token is 256 random bits, so a slow KDF would buy nothing.
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('provisioning_token',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('token_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('profile', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('tags', sa.JSON(), nullable=False),
    sa.Column('max_uses', sa.Integer(), nullable=False),
    sa.Column('uses', sa.Integer(), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_by', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('revoked', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token_hash')
    )
    # A plain ADD COLUMN: `device` is referenced by device_tag, so no batch "move and copy" on SQLite (see 0007).
    op.add_column('device', sa.Column('flower_public_key', sqlmodel.sql.sqltypes.AutoString(length=256),
                                      nullable=True))


def downgrade() -> None:
    op.drop_column('device', 'flower_public_key')
    op.drop_table('provisioning_token')
