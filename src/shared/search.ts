/** Typed search attribute keys (registered on the dev server by scripts/stack.sh). */
import { defineSearchAttributeKey, SearchAttributeType } from '@temporalio/common';
import { SEARCH_ATTRIBUTES } from './names';

export const DomainKey = defineSearchAttributeKey(SEARCH_ATTRIBUTES.domain, SearchAttributeType.KEYWORD);
export const HostKey = defineSearchAttributeKey(SEARCH_ATTRIBUTES.host, SearchAttributeType.KEYWORD);
export const StateKey = defineSearchAttributeKey(SEARCH_ATTRIBUTES.state, SearchAttributeType.KEYWORD);
export const BackupIdKey = defineSearchAttributeKey(SEARCH_ATTRIBUTES.backupId, SearchAttributeType.KEYWORD);
export const MethodKey = defineSearchAttributeKey(SEARCH_ATTRIBUTES.method, SearchAttributeType.KEYWORD);
